"""GUI pieces shared by the module panels (they drive Qt widgets, so they live outside the Qt-free Lib)."""
