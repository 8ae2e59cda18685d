"""Cluster pieces of EMS: placement now; membership and the directory come with the daemon."""
