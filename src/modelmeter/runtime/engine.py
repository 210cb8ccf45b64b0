"""One engine process: ``python -m modelmeter.runtime.engine --device cpu --socket PATH``.

Builds the model server for its device (the same builder the in-process engine uses), loads the platform base
model, then serves the fronts on its socket until SIGTERM. Settings come from the environment (``MODELMETER_*``);
metrics go to ``PROMETHEUS_MULTIPROC_DIR`` when set, where the fronts' ``/metrics`` aggregates them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from modelmeter.models.backends import configure_torch_threads, resolve_device
from modelmeter.models.engine.core import EngineCore, EngineCounters
from modelmeter.models.registry import BASE_MODEL_ARTIFACT, BASE_MODEL_ID, artifact_path
from modelmeter.models.serving import ModelServer, build_model_server
from modelmeter.models.simulated import SimulatedDevice
from modelmeter.models.source import ModelSource
from modelmeter.periodic import Periodic
from modelmeter.settings import Settings
from modelmeter.telemetry import Telemetry, multiprocess_dir_from_env

log = logging.getLogger("modelmeter.engine")


def build_engine(settings: Settings, device_spec: str, telemetry: Telemetry) -> tuple[ModelServer, EngineCounters]:
    """The engine's model server on ``device_spec`` with its counters and metrics hooks."""
    configure_torch_threads(settings.torch_threads)
    simulated = SimulatedDevice.parse(settings.simulated_device) if settings.simulated_device else None
    if simulated is not None:
        log.warning("SIMULATED DEVICE (%s): forward passes are waits and outputs are not a model's",
                    settings.simulated_device)
        telemetry.engine_simulated.set(1)
    counters = EngineCounters()
    server = build_model_server(settings, device=resolve_device(device_spec),
                                hooks=telemetry.server_hooks(counters), simulated=simulated)
    telemetry.watch(server)
    return server, counters


async def serve(settings: Settings, device_spec: str, socket: Path) -> None:
    telemetry = Telemetry(max_tenants=settings.metrics_max_tenants, max_models=settings.metrics_max_models,
                          multiprocess_dir=multiprocess_dir_from_env())
    server, counters = build_engine(settings, device_spec, telemetry)
    base = ModelSource(BASE_MODEL_ID, artifact_path(BASE_MODEL_ARTIFACT, settings.data_dir), "feature-extraction")
    async with server.use(base):  # loaded before the socket answers: a ready engine serves at once
        pass
    core = EngineCore(server, counters, path=socket, simulated=server.simulated is not None)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, core.stop)
    gauges = Periodic(telemetry.refresh_live, name="engine gauges", in_thread=False)
    gauges.start(1.0)
    parent = os.getppid()

    def orphaned() -> None:  # the supervisor died without stopping us (kill -9): nobody would restart or stop us
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone; stopping", parent)
            core.stop()

    orphan_check = Periodic(orphaned, name="engine parent check", in_thread=False)
    orphan_check.start(0.5)
    log.info("engine %s serving on %s", device_spec, socket)
    try:
        await core.run()
    finally:
        await orphan_check.stop()
        await gauges.stop()
        await server.close()
        telemetry.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modelmeter-engine")
    parser.add_argument("--device", required=True)
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, args.device, args.socket))


if __name__ == "__main__":
    main()
