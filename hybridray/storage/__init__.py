"""Site storage and cross-site datasets: addresses, object stores, and the sync protocol.

    from hybridray.storage import sync_dataset, verify_dataset, open_dataset
    sync_dataset("onprem:datasets/tickets", "cloud-a:datasets/tickets", cluster=cluster,
                 mask="configs/masks/tickets.yaml")
    verify_dataset("cloud-a:datasets/tickets", cluster=cluster)
    open_dataset("cloud-a:datasets/tickets", cluster=cluster).read()

Importing this package imports neither Ray nor pyarrow; the functions do when called.
"""

from hybridray.storage.fs import DatasetAddress, parse_address, site_filesystem
from hybridray.storage.masking import ColumnRule, MaskingSpec, load_spec
from hybridray.storage.objects import ObjectStore, dataset_store, site_store
from hybridray.storage.readers import CommittedDataset, list_datasets, open_dataset
from hybridray.storage.report import SyncResult
from hybridray.storage.sync import sync_dataset
from hybridray.storage.verify import VerifyReport, verify_dataset

__all__ = [
    "ColumnRule", "CommittedDataset", "DatasetAddress", "MaskingSpec", "ObjectStore",
    "SyncResult", "VerifyReport", "dataset_store", "list_datasets", "load_spec",
    "open_dataset", "parse_address", "site_filesystem", "site_store", "sync_dataset",
    "verify_dataset",
]
