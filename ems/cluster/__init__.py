"""Cluster pieces of EMS: placement (rendezvous hashing) and membership (ZooKeeper or
static peers). The directory shard lives in the C transfer server of each daemon."""
