"""Everything DeepSpeed in one package (parallel.engine=deepspeed): config checks (checks),
the generated ds_config JSON (ds_json), runtime setup and `deepspeed.initialize` (runtime),
the ZeRO and pipeline-engine training backends (backend, pipe_backend) and their checkpoints
(checkpoint). Nothing outside this package imports `deepspeed` itself; the package is only
imported when a config asks for the engine (deepspeed is an optional extra)."""
