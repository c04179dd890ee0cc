"""An image-classification service in three floors: `core` (pixels to probabilities), `serving`
(one worker's request path) and `http` (the boundary). Imports only point down:
http -> serving -> core. `service.py` declares the BentoML service over them.
"""

__version__ = "0.1.0"
