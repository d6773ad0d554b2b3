"""The apptainer executor: ``apptainer run`` under a detached supervisor per run, for HPC hosts."""
