"""The processes of ``modelmeter serve --workers N``: engines (one per device, ``engine``) and the supervisor
that starts them before the fronts, restarts an engine that dies and stops everything on SIGTERM
(``supervisor``). Fronts are the gateway app (``modelmeter.gateway``) in uvicorn worker processes."""
