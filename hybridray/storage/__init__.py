"""Site storage: every site's root as a pyarrow filesystem, and site-relative addresses."""

from hybridray.storage.fs import DatasetAddress, parse_address, site_filesystem

__all__ = ["DatasetAddress", "parse_address", "site_filesystem"]
