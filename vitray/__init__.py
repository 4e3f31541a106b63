"""vitray: pretrain and fine-tune Vision Transformers at scale on Ray.

Subpackages follow the data flow: ``vitray.pipeline`` (object storage -> Parquet
shards -> training batches), ``vitray.dedup`` (eval-set index -> exclusion list +
audit), ``vitray.training`` (model, loop, checkpoints), ``vitray.cluster`` (job
submission, cluster definitions, the end-to-end run).
"""

__version__ = "0.1.0"
