"""Whole-process timings of several commands in alternation, for before/after comparisons.

Each argument is `NAME=COMMAND` (a shell command, `exec`-prefixed so GNU time measures the
command itself). One untimed warm-up of each, then RUNS rounds, the order reversed every other
round; wall time from spawn to exit (perf_counter), peak RSS from GNU time (`/usr/bin/time`).
Prints one markdown row per command: median ms, min ms, median over the first command's median,
largest peak RSS in MiB, exit codes seen. BENCHMARKS.md (issue 17) gives the commands.

    python3 xtask/ab_bench.py 9 "cp=exec cp MODEL /tmp/copy.onnx" "new=exec target/release/prunec MODEL -o /tmp/a.onnx"
"""
import subprocess, sys, statistics, tempfile, json, time
# usage: abbench.py RUNS name=cmd... (cmd string with shell splitting)
runs=int(sys.argv[1]); cmds=[a.split('=',1) for a in sys.argv[2:]]
def timed(cmd):
    with tempfile.NamedTemporaryFile('r') as f:
        t0=time.perf_counter()
        p=subprocess.run(['/usr/bin/time','-f','%e %M','-o',f.name,'sh','-c',cmd],capture_output=True,text=True)
        w=time.perf_counter()-t0
        _,k=f.read().split()[-2:]
    return float(w), int(k)/1024, p.returncode
for n,c in cmds: timed(c)
res={n:[] for n,_ in cmds}
for r in range(runs):
    order=cmds if r%2==0 else cmds[::-1]
    for n,c in order: res[n].append(timed(c))
base=statistics.median(t for t,_,_ in res[cmds[0][0]])
for n,_ in cmds:
    ws=[t for t,_,_ in res[n]]; rs=[m for _,m,_ in res[n]]
    print(f"| {n} | {statistics.median(ws)*1e3:.1f} | {min(ws)*1e3:.1f} | {statistics.median(ws)/base:.1f}x | {max(rs):.1f} | rc {set(x for _,_,x in res[n])} |")
