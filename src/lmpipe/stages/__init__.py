"""One module per pipeline stage, named like the stage: ``run(params, paths)`` does the stage's work,
writes its outputs (atomically: all or nothing) and returns the summary its script prints. The scripts
in ``stages/`` only parse their paths, load params and call it."""
