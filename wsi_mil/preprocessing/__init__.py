"""Slides → tissue → tiles at a physical size → features in one HDF5 file per slide.

The verbs return in-memory objects; I/O is separate. `preprocess_slide` runs one slide end to end,
`run_batch` many (resumable, local / shards / Ray), and `read_feature_file` is the one reader the
rest of the project uses for ours, CLAM's and TRIDENT's feature files and `.pt` bags;
`export_features` writes them back in CLAM's or TRIDENT's layout.
"""

from wsi_mil.preprocessing.batch import SlideTask as SlideTask
from wsi_mil.preprocessing.batch import find_slides as find_slides
from wsi_mil.preprocessing.batch import read_manifest as read_manifest
from wsi_mil.preprocessing.batch import run_batch as run_batch
from wsi_mil.preprocessing.encoders import list_encoders as list_encoders
from wsi_mil.preprocessing.encoders import load_encoder as load_encoder
from wsi_mil.preprocessing.export import export_features as export_features
from wsi_mil.preprocessing.extract import extract_features as extract_features
from wsi_mil.preprocessing.feature_file import FeatureBag as FeatureBag
from wsi_mil.preprocessing.feature_file import read_feature_file as read_feature_file
from wsi_mil.preprocessing.feature_file import read_feature_meta as read_feature_meta
from wsi_mil.preprocessing.feature_file import write_feature_file as write_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig as PreprocessConfig
from wsi_mil.preprocessing.pipeline import SlideResult as SlideResult
from wsi_mil.preprocessing.pipeline import preprocess_slide as preprocess_slide
from wsi_mil.preprocessing.slide import SlideReader as SlideReader
from wsi_mil.preprocessing.slide import open_slide as open_slide
from wsi_mil.preprocessing.tiling import TileGrid as TileGrid
from wsi_mil.preprocessing.tiling import TilingParams as TilingParams
from wsi_mil.preprocessing.tiling import tile_grid as tile_grid
from wsi_mil.preprocessing.tissue import TissueMask as TissueMask
from wsi_mil.preprocessing.tissue import TissueParams as TissueParams
from wsi_mil.preprocessing.tissue import segment_tissue as segment_tissue
