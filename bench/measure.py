"""Runs a command `--repeat` times; prints median wall seconds and peak RSS (MB) as JSON."""
import json, resource, statistics, subprocess, sys, time

def main():
    repeat = int(sys.argv[1])
    cmd = sys.argv[2:]
    walls, rss = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        # ru_maxrss of children is the largest single child so far, in KiB on Linux.
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"median_s": statistics.median(walls), "min_s": min(walls), "peak_rss_mb": rss}))

main()
