"""Images: archives imported into a content-addressed layer store, run as overlayfs roots.

`import_image` reads an OCI image layout or a docker save archive (source.py),
unpacks each layer once, safely (layer.py), into the store (store.py).
"""

from cgctl.images.importer import import_image
from cgctl.images.layer import LayerError
from cgctl.images.source import ImageError
from cgctl.images.store import Store, default_root, parse_reference

__all__ = ["ImageError", "LayerError", "Store", "default_root", "import_image", "parse_reference"]
