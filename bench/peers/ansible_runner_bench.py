"""The ansible-runner peer of `muster-bench overhead` (see BENCHMARKS.md, §4).

Runs one playbook N times through ansible-runner's Python API, the engine AWX
uses (`ansible_runner.run(private_data_dir=..., playbook=...)`, which starts
`ansible-playbook` under its own event handling), and, as a floor, N times as
a plain `ansible-playbook` process from the same virtualenv. With
--container-image, also N times through ansible-runner with process isolation
in that Docker image (`process_isolation_executable="docker"`), as AWX runs a
job in an execution environment. They take turns, one iteration each, so that
the machine's load touches them alike and each runner/playbook pair's
difference is ansible-runner's own cost. Each is timed from the call to its
return, after warm-up runs that are not counted. Prints one JSON line (each
list in the order the iterations ran):

    {"ansible_runner": {"version": ..., "ms": [...]},
     "ansible_playbook": {"version": ..., "ms": [...]},
     "ansible_runner_container": {"image": ..., "ms": [...]}}

Usage: python ansible_runner_bench.py --playbook-dir DIR --playbook FILE
           [--iterations N] [--warmup W] [--no-floor] [--container-image IMAGE]
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
    parser.add_argument(
        "--container-image", help="also run ansible-runner with process isolation in this Docker image"
    )
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

    with tempfile.TemporaryDirectory(prefix="muster-bench-ansible-runner-") as private, \
            tempfile.TemporaryDirectory(prefix="muster-bench-ansible-runner-docker-") as isolated:
        project = os.path.join(private, "project")
        for data_dir in (private, isolated):
            os.makedirs(os.path.join(data_dir, "project"))
            shutil.copy(source, os.path.join(data_dir, "project"))

        def run_with(data_dir, **isolation):
            result = ansible_runner.run(
                private_data_dir=data_dir,
                playbook=args.playbook,
                quiet=True,
                rotate_artifacts=2,
                **isolation,
            )
            if result.status != "successful" or result.rc != 0:
                fail(f"ansible-runner ended {result.status} (rc {result.rc}):\n{result.stdout.read()}")

        def through_runner():
            run_with(private)

        def through_runner_in_container():
            run_with(
                isolated,
                process_isolation=True,
                process_isolation_executable="docker",
                container_image=args.container_image,
            )

        def plain():
            done = subprocess.run(
                [playbook_bin, args.playbook], cwd=project, capture_output=True, text=True
            )
            if done.returncode != 0:
                fail(f"ansible-playbook exited {done.returncode}:\n{done.stdout}{done.stderr}")

        steps = {"ansible_runner": through_runner}
        if not args.no_floor:
            steps["ansible_playbook"] = plain
        if args.container_image:
            steps["ansible_runner_container"] = through_runner_in_container
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        durations = {name: [] for name in steps}
        for _ in range(args.iterations):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                durations[name].append((time.perf_counter() - began) * 1000.0)

        report = {
            "ansible_runner": {"version": version("ansible-runner"), "ms": durations["ansible_runner"]}
        }
        if not args.no_floor:
            report["ansible_playbook"] = {
                "version": version("ansible-core"),
                "ms": durations["ansible_playbook"],
            }
        if args.container_image:
            report["ansible_runner_container"] = {
                "image": args.container_image,
                "ms": durations["ansible_runner_container"],
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
