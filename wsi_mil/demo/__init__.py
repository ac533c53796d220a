"""A built-in demo: a synthetic cohort of pyramidal TIFF slides, and the commands that run on it."""

from wsi_mil.demo.synthetic import DemoSlide as DemoSlide
from wsi_mil.demo.synthetic import make_demo_cohort as make_demo_cohort
from wsi_mil.demo.synthetic import write_synthetic_slide as write_synthetic_slide
