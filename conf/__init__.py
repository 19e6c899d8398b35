"""Hydra config groups, packaged as `selfdistill.conf` so an installed trainer finds them."""
