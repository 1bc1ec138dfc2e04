"""Use cases, one transaction each. Edges call these; these call domain/ and store/."""
