"""Writers for what a build delivers: edge bundles (and, later, OCI images)."""
