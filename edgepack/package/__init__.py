"""Writers for what a build delivers: edge bundles and cloud (OCI) images, and the registry client."""
