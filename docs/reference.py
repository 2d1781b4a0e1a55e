"""The documentation's reference tables, generated from the code they describe.

    python docs/reference.py            check: exit 1 naming each stale table
    python docs/reference.py --write    rewrite the stale tables in place

Each table sits in its page between two marks, `<!-- generated: NAME ... -->` and
`<!-- end generated: NAME -->`, and is committed (the pages read the same on GitHub and
in the site). What fills each one:

    settings   configuration.md   every field of `service.config.Settings`
    metrics    operations.md      every `nextword_*` metric of prometheus_client's registry
    errors     api.md             every error of `service.errors`, answered as
                                  `service.api.errors` answers it (HTTP status, close code)
    openapi    api.md             the service's own OpenAPI document (`create_app().openapi()`)

mkdocs runs this module as a hook (mkdocs.yml): a build with a stale table fails, so
`make lint` (mkdocs build --strict) catches a setting, metric, error or route changed
without its documentation.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

BEGIN = "<!-- generated: {name} (python docs/reference.py --write; do not edit by hand) -->"
END = "<!-- end generated: {name} -->"


def cell(text: object) -> str:
    """Text for one Markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


# --- settings --------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    """A setting's type as an operator writes it."""
    if get_origin(annotation) is Literal:
        return " or ".join(f"`{value}`" for value in get_args(annotation))
    return {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}.get(
        annotation, str(annotation)
    )


def default_text(value: Any) -> str:
    """A default as the environment variable would spell it; paths inside the repository
    relative to it (the bundled models), so the table does not depend on the checkout."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, Path):
        import service

        source = Path(service.__file__).resolve().parent.parent  # the checkout's root
        try:
            return f"`{value.resolve().relative_to(source)}`"
        except ValueError:
            return f"`{value}`"
    if value == "":
        return '`""` (none)'
    return f"`{value}`"


def settings_table() -> str:
    """Every field of `Settings`: environment variable, name, type, default, description."""
    from service.config import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    rows = []
    for name, field in Settings.model_fields.items():
        if not field.description:
            raise ValueError(f"Settings.{name} has no description: the table needs one")
        alias = field.validation_alias
        env = str(alias) if isinstance(alias, str) else f"{prefix}{name}".upper()
        rows.append(
            [
                f"`{env}`",
                f"`{name}`",
                type_name(field.annotation),
                default_text(field.get_default(call_default_factory=True)),
                field.description,
            ]
        )
    return table(["variable", "setting", "type", "default", "meaning"], rows)


# --- metrics ---------------------------------------------------------------------------


def metrics_table() -> str:
    """Every `nextword_*` metric registered by `service.metrics`, as `/metrics` names it."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics  # noqa: F401  (registers the metrics)

    rows = []
    # prometheus_client keeps no public list of a registry's collectors with their labels.
    collectors = [c for c in REGISTRY._collector_to_names if isinstance(c, MetricWrapperBase)]
    for metric in sorted(collectors, key=lambda c: c._name):
        if not metric._name.startswith("nextword_"):
            continue
        kind = metric._type
        name = f"{metric._name}_total" if kind == "counter" else metric._name
        if kind == "gauge":
            kind = f"gauge ({metric._multiprocess_mode} over processes)"
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "-"
        rows.append([f"`{name}`", kind, labels, metric._documentation])
    return table(["metric", "type", "labels", "meaning"], rows)


# --- errors ----------------------------------------------------------------------------


def error_classes() -> Iterator[type]:
    """Every subclass of `NextwordError`, depth first, in definition order."""
    from service.errors import NextwordError

    def walk(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    return walk(NextwordError)


def errors_table() -> str:
    """Each error code: HTTP status, Retry-After, WebSocket close code, meaning."""
    from service.api.errors import answer_for

    rows = []
    for cls in error_classes():
        answer = answer_for(cls)
        # An error that carries its own wait (rate limits) sends Retry-After too.
        retry = (
            answer.retry_after_s is not None
            or "retry_after_s" in inspect.signature(cls.__init__).parameters
        )
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        rows.append(
            [
                f"`{cls.code}`",
                f"`{cls.__name__}`",
                str(cls.status),
                "yes" if retry else "-",
                str(answer.close),
                doc,
            ]
        )
    return table(
        ["code", "error", "HTTP status", "Retry-After", "WebSocket close", "meaning"], rows
    )


# --- OpenAPI ---------------------------------------------------------------------------


def schema_type(schema: dict[str, Any]) -> str:
    """A JSON schema in a few words, references linked to their table below."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(schema_type(part) for part in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {schema_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"object of {schema_type(schema['additionalProperties'] or {})}"
    if "enum" in schema:
        return " or ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    return str(kind or "any")


def constraints(schema: dict[str, Any]) -> str:
    """A schema's bounds, as `1 to 50` or `at most 10000 characters`."""
    for part in schema.get("anyOf", [schema]):
        low, high = part.get("minimum"), part.get("maximum")
        if low is not None and high is not None:
            return f"{low} to {high}"
        if part.get("maxLength") is not None:
            return f"at most {part['maxLength']} characters"
    return ""


def operation_section(path: str, method: str, op: dict[str, Any]) -> list[str]:
    """One route: what it does, its parameters, its body and its answers."""
    lines = [f"### {method.upper()} `{path}`", ""]
    if op.get("description"):
        lines += [" ".join(op["description"].split()), ""]
    params = op.get("parameters", [])
    if params:
        rows = [
            [
                f"`{p['name']}`",
                p["in"],
                "yes" if p.get("required") else "no",
                schema_type(p.get("schema", {})),
                p.get("description") or p.get("schema", {}).get("description", ""),
            ]
            for p in params
        ]
        lines += [table(["parameter", "in", "required", "type", "meaning"], rows), ""]
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        lines += [f"Body: {schema_type(body['schema'])}.", ""]
    rows = []
    for status, answer in op.get("responses", {}).items():
        content = answer.get("content", {})
        json_body = content.get("application/json", {}).get("schema")
        kind = schema_type(json_body) if json_body else ", ".join(f"`{c}`" for c in content)
        rows.append([status, kind or "-", answer.get("description", "")])
    lines += [table(["status", "body", "when"], rows), ""]
    return lines


def schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    """One body: its fields with their types, bounds, defaults and meanings."""
    lines = [f"#### {name}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    required = set(schema.get("required", []))
    rows = []
    for field, prop in schema.get("properties", {}).items():
        default = f"`{prop['default']}`" if "default" in prop else ""
        if prop.get("default", 0) is None:
            default = "`null`"
        rows.append(
            [
                f"`{field}`",
                schema_type(prop),
                "yes" if field in required else "no",
                default,
                constraints(prop),
                prop.get("description", ""),
            ]
        )
    if rows:
        lines += [table(["field", "type", "required", "default", "bounds", "meaning"], rows), ""]
    return lines


def openapi_reference() -> str:
    """Every HTTP route and body of the service's OpenAPI document."""
    from service.api import create_app
    from service.config import Settings

    # The defaults, not this shell's NEXTWORD_* variables (they shape the bodies' limits).
    spec = create_app(Settings.model_construct()).openapi()
    lines = [
        f"From the OpenAPI {spec['openapi']} document of {spec['info']['title']} "
        f"{spec['info']['version']} (served live at `/openapi.json`, browsable at `/docs`).",
        "",
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            lines += operation_section(path, method, op)
    lines += ["### Bodies", ""]
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        lines += schema_section(name, schema)
    return "\n".join(lines).rstrip()


# --- the pages -------------------------------------------------------------------------

TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "settings": ("configuration.md", settings_table),
    "metrics": ("operations.md", metrics_table),
    "errors": ("api.md", errors_table),
    "openapi": ("api.md", openapi_reference),
}


def region(name: str) -> re.Pattern[str]:
    """The generated region `name` of a page, marks included."""
    begin = re.escape(BEGIN.format(name=name))
    return re.compile(f"{begin}\n.*?{re.escape(END.format(name=name))}", re.S)


def regenerate(text: str, name: str, body: str) -> str:
    """`text` with its region `name` holding `body`; a page without the region is an error."""
    pattern = region(name)
    if not pattern.search(text):
        raise ValueError(f"no generated region {name!r} (add its two marks to the page)")
    block = f"{BEGIN.format(name=name)}\n{body}\n{END.format(name=name)}"
    return pattern.sub(lambda _: block, text, count=1)


def stale(docs: Path = DOCS) -> list[str]:
    """The tables whose page differs from what the code generates now (page: name)."""
    found = []
    for name, (page, make) in TABLES.items():
        text = (docs / page).read_text()
        if regenerate(text, name, make()) != text:
            found.append(f"{page}: {name}")
    return found


def write(docs: Path = DOCS) -> list[str]:
    """Rewrite every stale table in place; returns what was rewritten."""
    rewritten = []
    for name, (page, make) in TABLES.items():
        path = docs / page
        text = path.read_text()
        new = regenerate(text, name, make())
        if new != text:
            path.write_text(new)
            rewritten.append(f"{page}: {name}")
    return rewritten


def on_pre_build(config: Any) -> None:
    """mkdocs hook: refuse to build documentation whose tables no longer match the code."""
    from mkdocs.exceptions import PluginError

    found = stale(Path(config["docs_dir"]))
    if found:
        raise PluginError(
            f"generated tables out of date ({', '.join(found)}): run python docs/reference.py --write"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite stale tables in place")
    args = parser.parse_args(argv)
    if args.write:
        for name in write():
            print(f"rewrote {name}")
        return 0
    found = stale()
    for name in found:
        print(f"stale: {name} (python docs/reference.py --write)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
