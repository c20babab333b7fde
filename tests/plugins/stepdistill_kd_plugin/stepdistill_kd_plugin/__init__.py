"""Test plugin: a distillation method that lives outside the stepdistill package."""
