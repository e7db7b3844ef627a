"""The local actuator's bookkeeping without processes: replicas whose start never ran."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llmmesh.common.topology import PoolKey
from llmmesh.localmesh import EMULATOR_REPOSITORY
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.actuators.local import LocalActuator
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool

KEY = PoolKey("auto", "v1")


async def test_replicas_cancelled_before_their_start_ran_leave_the_pool(tmp_path: Path) -> None:
    actuator = LocalActuator(
        LocalActuatorSettings(
            orchestrator_address="127.0.0.1:9",  # never reached: no start runs
            log_dir=tmp_path,
            pools=[
                ManagedPool(
                    pool=KEY.pool,
                    model_version=KEY.model_version,
                    model_repository=EMULATOR_REPOSITORY,
                    models=["tensorrt_llm"],
                )
            ],
        )
    )
    try:
        # Up then down with nothing in between that lets the start tasks run (as one round's
        # observe then apply): cancelled before they ran, they never reach their own cleanup.
        await actuator.apply(KEY, 2, "up")
        await actuator.apply(KEY, 0, "down")
        for _ in range(3):
            await asyncio.sleep(0)
        assert (await actuator.observe())[KEY] == ReplicaCounts(ready=0)
    finally:
        await actuator.close()
