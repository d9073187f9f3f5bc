"""Rounds: their state, intake of uploads, closing, judging, checks and scores."""
