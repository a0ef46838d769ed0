"""Evaluation of trained runs: FID and IS with the FID Inception network, NLL in bits/dim."""
