"""Video-blend example: AlphaBlender-mixed spatial/temporal denoiser trained on synthetic moving shapes."""
