"""The paper's other evaluation protocols, run on GATE features with MMEngine."""
