"""The engine: one process per device owning the models, the adapter pool and the batcher, fed by the fronts.

- ``protocol``: the messages between a front and an engine (msgspec structs; ids and outputs as raw buffers);
- ``client``: what the routes call (``EngineClient.submit``), in-process (``LocalEngine``, in ``local``) or over
  ZMQ (``RemoteEngine``); the front side imports no torch;
- ``core``: the engine process's loop; ``simulated``: a device that waits instead of computing.
"""
