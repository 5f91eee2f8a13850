"""The artifact: manifest and plan, pack, device profiles."""
