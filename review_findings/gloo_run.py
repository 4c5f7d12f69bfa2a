import os, sys, subprocess, tempfile, pathlib, json
here = pathlib.Path(__file__).resolve().parent
scen, world = sys.argv[1], int(sys.argv[2])
wd = pathlib.Path(tempfile.mkdtemp())
procs = [subprocess.Popen([sys.executable, str(here / "gloo_worker.py"), scen, str(wd)],
         env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), INIT=f"file://{wd}/rdzv", OMP_NUM_THREADS="1"),
         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
for r, p in enumerate(procs):
    try:
        o, e = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for q in procs: q.kill()
        print("TIMEOUT rank", r); continue
    f = wd / f"{scen}.{r}.json"
    print(f"rank {r} exit {p.returncode}:", f.read_text() if f.exists() else e[-1500:])
