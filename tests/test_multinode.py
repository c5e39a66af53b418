"""Two nodes, for real, on one machine: two ``torchrun`` launchers (``--nnodes 2``, one process each,
c10d rendezvous on 127.0.0.1, gloo, CPU) train the tiny data set with labels for 2 epochs and every
rank writes what it consumed (``util.trace_ranks``). Checked: the global ranks read disjoint slots
that cover each epoch; both nodes end every epoch with the same weights; a run stopped after epoch
1 (SIGTERM on both nodes, as a preemption) and restarted on both nodes ends equal to the
uninterrupted run. The restart goes through ``docker/slurm_train.sbatch`` as a requeued job would,
under a stand-in ``srun`` (one task per node, all on this machine), ``scontrol`` and
``nvidia-smi``, with a recording ``torchrun`` in front of the real one: the torchrun arguments the
script and the entrypoint derive are checked too."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import CLASSES, TRAIN_PER_CLASS, argv_for
from relabel_dali.config import parse_command_line
from relabel_dali.train.checkpoint import LAST_NAME
from relabel_dali.train.models import build_model
from relabel_dali.train.trace import parameters_sha256, trace_path

REPO = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash") or "/bin/bash"
EPOCHS, SAMPLES = 2, len(CLASSES) * TRAIN_PER_CLASS
pytestmark = pytest.mark.slow

STOP_AT_EPOCH_2 = textwrap.dedent("""
    # train.py, with SIGTERM (a preemption) arriving at the start of epoch 2 on every node.
    import os, signal, sys
    import train

    original = train.train_one_epoch

    def train_one_epoch(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs)

    train.train_one_epoch = train_one_epoch
    sys.exit(train.main())
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "RANK",
                                "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "TORCHELASTIC"))}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def wait_all(processes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """(exit code, output) of each process (its pipe, or the log file it writes to: ``log``); kills
    them all (their process groups) on a timeout."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output if process.stdout is not None else process.log.read_text()))
    finally:
        stop(processes)
    return results


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def two_nodes(script: Path, argv: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two torchrun launchers as two nodes, started (``wait_all`` waits for them), their output
    going to ``logs/node<i>.log``: node ranks assigned by the c10d rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes",
               "--local-addr=127.0.0.1", "--max-restarts=0", str(script), *argv]
    processes = []
    for node in range(2):
        log = logs / f"node{node}.log"
        with open(log, "w") as output:
            processes.append(subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=output,
                                              stderr=subprocess.STDOUT, text=True, start_new_session=True))
        processes[-1].log = log
    return processes


def traces(out: Path, epoch: int) -> list[dict]:
    return [json.loads(trace_path(out, epoch, rank).read_text()) for rank in range(2)]


def run_argv(tiny: Path, out: Path) -> list[str]:
    return argv_for(tiny, out, "--optim.epochs", str(EPOCHS), "--util.trace_ranks", "true",
                    "--util.tensorboard", "false")


def checkpoint_sha256(out: Path, argv: list[str]) -> str:
    """The parameters' digest of the run's last checkpoint, as the ranks compute theirs."""
    cfg, _ = parse_command_line(argv)
    model = build_model(cfg)
    model.load_state_dict(torch.load(out / LAST_NAME, weights_only=False)["model"])
    return parameters_sha256(model)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):
    """The uninterrupted run and the run to be stopped, started together (two rendezvous, four
    launchers: most of each run is process start-up and teardown, which overlap): {name: (output
    folder, launchers)}."""
    out = tmp_path_factory.mktemp("two-nodes") / "run"
    root = tmp_path_factory.mktemp("stopped")
    driver = root / "stop_at_epoch_2.py"
    driver.write_text(STOP_AT_EPOCH_2)
    stopped_out = root / "runs" / "rn50"
    runs = {"uninterrupted": (out, two_nodes(REPO / "train.py", run_argv(tiny, out), out.parent)),
            "stopped": (stopped_out, two_nodes(driver, run_argv(tiny, stopped_out), root))}
    yield runs
    for _, processes in runs.values():  # runs that no test waited for (deselected)
        stop(processes)


@pytest.fixture(scope="module")
def uninterrupted(launched):
    out, processes = launched["uninterrupted"]
    results = wait_all(processes)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return out


@pytest.fixture(scope="module")
def stopped(launched):
    """A run stopped by SIGTERM on both nodes at the start of epoch 2: its output folder."""
    out, processes = launched["stopped"]
    results = wait_all(processes)
    # Both launchers report the stop as a failure (torchrun knows no "preempted"); rank 0 says where
    # it stopped. (A launcher may instead report losing the rendezvous store, when the node that
    # hosts it ends first.)
    assert all(code != 0 for code, _ in results), results
    assert any("stopped by SIGTERM at epoch 2, step 1 of 3" in output for _, output in results), results
    assert torch.load(out / LAST_NAME, weights_only=False)["epoch"] == 1
    return out


class TestTwoNodes:
    def test_ranks_read_disjoint_slots_that_cover_each_epoch(self, uninterrupted):
        for epoch in range(EPOCHS):
            records = traces(uninterrupted, epoch)
            assert [(r["rank"], r["world_size"], r["local_rank"]) for r in records] == [(0, 2, 0), (1, 2, 0)]
            assert sorted(r["node_rank"] for r in records) == [0, 1], "one process on each of two nodes"
            slots = [set(r["indices"]) for r in records]
            assert all(len(r["indices"]) == len(s) == SAMPLES // 2 for r, s in zip(records, slots))
            assert not slots[0] & slots[1] and slots[0] | slots[1] == set(range(SAMPLES))
        orders = [traces(uninterrupted, epoch)[0]["indices"] for epoch in range(EPOCHS)]
        assert orders[0] != orders[1], "each epoch draws its own order"

    def test_both_nodes_end_every_epoch_with_the_same_weights(self, uninterrupted, tiny):
        digests = [[r["params_sha256"] for r in traces(uninterrupted, epoch)] for epoch in range(EPOCHS)]
        assert all(a == b for a, b in digests) and digests[0][0] != digests[1][0]
        assert checkpoint_sha256(uninterrupted, run_argv(tiny, uninterrupted)) == digests[-1][0]


class TestSlurm:
    def test_requeued_job_resumes_both_nodes_exactly(self, uninterrupted, stopped, tiny, tmp_path):
        """The stopped run's job comes back (requeued): the batch script, its srun, the entrypoint and
        torchrun restart both nodes, which continue from the checkpoint of epoch 1."""
        fakebin = tmp_path / "bin"
        fakebin.mkdir()
        log = tmp_path / "calls"
        port = free_port()
        tool(fakebin, "scontrol", 'printf "127.0.0.1\\nlocalhost\\n"')  # hostnames of the two nodes
        tool(fakebin, "nvidia-smi", 'echo "GPU 0: stand-in"')  # one process per node
        tool(fakebin, "torchrun", f'echo "node $SLURM_NODEID: torchrun $*" >> "{log}"\n'
                                  f'exec "{sys.executable}" -m torch.distributed.run "$@"')
        tool(fakebin, "srun", textwrap.dedent(f"""\
            # One task per node of the allocation, all on this machine; the container's entrypoint is
            # the checkout's.
            echo "srun $*" >> "{log}"
            while [[ "$1" == --* ]]; do shift; done
            command=$1; shift
            [[ "$command" == /usr/local/bin/relabel-train ]] && command="{REPO}/docker/entrypoint.sh"
            pids=()
            for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
              SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "{BASH}" "$command" "$@" \\
                > "{tmp_path}/node$node.log" 2>&1 &
              pids+=($!)
            done
            status=0
            for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
            exit $status"""))
        runs = stopped.parent
        env = clean_env(PATH=f"{fakebin}:{os.environ['PATH']}", RELABEL_DALI_HOME=str(REPO), RUNTIME="pyxis",
                        CONFIG="configs/base.yaml", RUNS_DIR=str(runs), MASTER_PORT=str(port),
                        SLURM_JOB_ID="4242", SLURM_JOB_NAME="rn50", SLURM_JOB_NODELIST="node[1-2]",
                        SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NODEID="0", SLURM_RESTART_COUNT="1")
        job = subprocess.Popen([BASH, str(REPO / "docker" / "slurm_train.sbatch"), *run_argv(tiny, stopped)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        ((code, output),) = wait_all([job])
        nodes = [(tmp_path / f"node{n}.log").read_text() for n in range(2) if (tmp_path / f"node{n}.log").exists()]
        assert code == 0, output + "".join(text[-3000:] for text in nodes)
        assert f"job 4242 (restart 1) on 2 nodes, rendezvous 127.0.0.1:{port}" in output

        calls = log.read_text().splitlines()
        srun = next(line.split() for line in calls if line.startswith("srun "))
        assert srun[1] == "--ntasks-per-node=1" and "/usr/local/bin/relabel-train" in srun
        train_args = srun[srun.index("/usr/local/bin/relabel-train") + 1:]
        assert train_args[train_args.index("--resume") + 1] == "auto"
        launches = sorted(line.split(": ", 1) for line in calls if " torchrun " in line)
        for node, (who, line) in enumerate(launches):
            words = line.split()
            assert who == f"node {node}" and words[words.index("train.py") + 1:] == train_args
            assert words[1:8] == ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d",
                                  f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=4242", "train.py"]

        assert "resumed from" in "".join(nodes)
        resumed = torch.load(stopped / LAST_NAME, weights_only=False)
        straight = torch.load(uninterrupted / LAST_NAME, weights_only=False)
        assert resumed["epoch"] == straight["epoch"] == EPOCHS
        assert states_equal(resumed["model"], straight["model"])
        assert resumed["schedule"] == straight["schedule"]
        momenta = [(a["momentum_buffer"], b["momentum_buffer"]) for a, b in
                   zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values())]
        assert momenta and all(torch.equal(a, b) for a, b in momenta)
        # The repeated epoch read the same slots on the same ranks, and ended on the same weights.
        for again, first in zip(traces(stopped, EPOCHS - 1), traces(uninterrupted, EPOCHS - 1)):
            assert again["indices"] == first["indices"] and again["params_sha256"] == first["params_sha256"]


def tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
