"""bookstack package."""
