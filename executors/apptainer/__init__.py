"""The apptainer executor: ``apptainer exec`` as asyncio subprocesses, for HPC hosts."""
