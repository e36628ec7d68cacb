"""Extract once, train many: the frozen half's features in a store on disk.

``writer`` extracts (resumable, distributed), ``manifest`` says what a store is and refuses
mismatches, ``reader`` serves stored features memory-mapped, ``images`` lists what to extract.
``mmseg_gate.sources.StoredSource`` puts a store behind the source contract.
"""
from ..datasets.images import pixel_key
from .images import ImageList, dataset_images, folder_images
from .manifest import StoreError, make_header, read_manifest
from .reader import FeatureStore
from .writer import extract_features

__all__ = ['ImageList', 'dataset_images', 'folder_images', 'pixel_key', 'StoreError',
           'make_header', 'read_manifest', 'FeatureStore', 'extract_features']
