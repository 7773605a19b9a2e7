"""The ansible-runner peer of `muster-bench overhead` (see BENCHMARKS.md, §4).

Runs one playbook N times through ansible-runner's Python API, the engine AWX
uses (`ansible_runner.run(private_data_dir=..., playbook=...)`, which starts
`ansible-playbook` under its own event handling), and, as a floor, N times as
a plain `ansible-playbook` process from the same virtualenv. The two take
turns, one iteration each, so that the machine's load touches them alike and
each pair's difference is ansible-runner's own cost. Each is timed from the
call to its return, after warm-up runs that are not counted. Prints one JSON
line (the two lists in the order the pairs ran):

    {"ansible_runner": {"version": ..., "ms": [...]},
     "ansible_playbook": {"version": ..., "ms": [...]}}

Usage: python ansible_runner_bench.py --playbook-dir DIR --playbook FILE
           [--iterations N] [--warmup W] [--no-floor]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def fail(message):
    print(f"ansible_runner_bench.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--playbook-dir", required=True, help="directory holding the playbook")
    parser.add_argument("--playbook", required=True, help="the playbook's file name in it")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-floor", action="store_true", help="skip plain ansible-playbook")
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        fail("--iterations must be at least 1 and --warmup at least 0")
    source = os.path.join(args.playbook_dir, args.playbook)
    if not os.path.isfile(source):
        fail(f"no playbook at {source}")

    # ansible-runner starts `ansible-playbook` from PATH: this interpreter's
    # virtualenv holds the one installed beside it.
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    playbook_bin = shutil.which("ansible-playbook")
    if playbook_bin is None:
        fail(f"ansible-playbook is not in {bin_dir}; run scripts/bench-env.sh")
    try:
        import ansible_runner
        from importlib.metadata import version
    except ImportError as error:
        fail(f"{error}; run scripts/bench-env.sh and pass its python")

    with tempfile.TemporaryDirectory(prefix="muster-bench-ansible-runner-") as private:
        project = os.path.join(private, "project")
        os.makedirs(project)
        shutil.copy(source, project)

        def through_runner():
            result = ansible_runner.run(
                private_data_dir=private,
                playbook=args.playbook,
                quiet=True,
                rotate_artifacts=2,
            )
            if result.status != "successful" or result.rc != 0:
                fail(f"ansible-runner ended {result.status} (rc {result.rc}):\n{result.stdout.read()}")

        def plain():
            done = subprocess.run(
                [playbook_bin, args.playbook], cwd=project, capture_output=True, text=True
            )
            if done.returncode != 0:
                fail(f"ansible-playbook exited {done.returncode}:\n{done.stdout}{done.stderr}")

        steps = [through_runner] if args.no_floor else [through_runner, plain]
        for _ in range(args.warmup):
            for step in steps:
                step()
        durations = [[] for _ in steps]
        for _ in range(args.iterations):
            for step, samples in zip(steps, durations):
                began = time.perf_counter()
                step()
                samples.append((time.perf_counter() - began) * 1000.0)

        report = {
            "ansible_runner": {"version": version("ansible-runner"), "ms": durations[0]}
        }
        if not args.no_floor:
            report["ansible_playbook"] = {"version": version("ansible-core"), "ms": durations[1]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
