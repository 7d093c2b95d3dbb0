"""One launch path: every rank's spec comes from the same options, on this machine or an agent's."""

from dataclasses import fields

from llmd.app.agent import LaunchRequest, launch_options
from llmd.app.options import EngineOptions
from llmd.engine.plan import make_plan
from llmd.engine.worker import RankSpec

from llmd.engine.presets import preset

SMOL = preset("smollm2-135m")


def test_an_agent_builds_the_spec_rank_0_runs():
    plan = make_plan(SMOL, [2, 1, 1]).to_dict()
    options = EngineOptions(plan=plan, dtype="bfloat16", weights="int4", context=512, slots=3, timeout_s=30,
                            compile=True, reshardable=True, slowdown=((2, 1.5, 8),))
    rank0 = options.rank_spec("/models/m", rank=0, threads=4)
    request = LaunchRequest(launch_id="l1", master_addr="198.18.0.1", master_port=29500, model="default",
                            ranks=[{"rank": 2, "device": "cpu"}], **EngineOptions.of(rank0).wire())
    remote = launch_options(request).rank_spec("/elsewhere/m", rank=2, threads=1, device="cpu")
    # Everything but where it runs is rank 0's: a field the request dropped would differ here.
    where = {"model_dir", "rank", "device", "threads", "shm_path", "wake_fds"}
    for f in fields(RankSpec):
        if f.name not in where:
            assert getattr(remote, f.name) == getattr(rank0, f.name), f.name
    assert set(f.name for f in fields(EngineOptions)) - {"device"} == set(EngineOptions.of(rank0).wire())
    assert remote.slowdown_of(2).factor == 1.5 and remote.slowdown_of(2).from_step == 8
