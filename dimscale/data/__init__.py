"""Sharded image data: tools/make_shards.py writes WebDataset shards by resolution bucket; build_loader reads them."""
from dimscale.data.buckets import BucketSchedule, default_bucket_table, nearest_bucket

__all__ = ["BucketSchedule", "ShardLoader", "build_loader", "default_bucket_table", "nearest_bucket", "read_manifest"]


def __getattr__(name):
    # The loader pulls in torch; tools/make_shards.py only needs buckets/images, so import it on first use.
    if name in ("ShardLoader", "build_loader", "read_manifest"):
        from dimscale.data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'dimscale.data' has no attribute '{name}'")
