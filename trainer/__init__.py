"""Cache-fed distillation training on mmengine's Runner; depends on featcache, never the reverse."""
