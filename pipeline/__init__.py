"""Object storage -> Parquet shards (``vitray shard``) -> training batches (reader)."""
