"""The built-in tasks, one module per family of tasks; each registers its classes by name
(`gpg_vl.task.register_task`) when imported. The registry imports every module here."""
