"""What every benchmark shares.

machine.py   the header of every table: CPU, cores, load, versions; the command line
models.py    the models a benchmark serves (bundled, or random-weight stand-ins)
server.py    a free port, a server subprocess (ready check, SIGTERM stop), a redis-server
cpu.py       CPU seconds of process trees and of the whole machine
results.py   the JSON (and text) written to benchmarks/results/
wsload.py    a WebSocket load generator (client processes, closed loop or paced)
"""
