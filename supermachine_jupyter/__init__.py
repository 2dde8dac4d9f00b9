"""supermachine_jupyter: run notebook cells inside hardware-isolated Linux microVMs."""
__version__ = "0.1.0"
