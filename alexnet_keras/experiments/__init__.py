"""Many runs under one parent: ablation studies (`ablate`), keras-tuner sweeps (`tune`), their study
and sweep files, the statistics and report that turn children into verdicts, and Ray for running
children beyond one process."""
