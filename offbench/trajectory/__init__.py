"""Trajectory-level pieces shared by the methods that model whole windows of an episode: the temporal
U-Net and the episode windows with their normalisation (PGD's trajectory model in offbench/pgd; the
trajectory planners in algorithms/)."""
