// Workflows saved before the fine-tune node's option nodes (pack version <= 0.2.0) store all of its settings as
// one list of widget values. ComfyUI assigns saved values to widgets by position, which would put them into the
// wrong widgets now; this puts each of the node's own settings back by name and says which settings now live on
// the option nodes (those that differed from their defaults, with their values).
import { app } from "../../../scripts/app.js";  // served as /extensions/<pack>/js/this.js

// The node's widgets in the layout of versions up to 0.2.0 (older versions saved a prefix of this list).
const OLD_LAYOUT = [
  "dataset_folder", "steps", "learning_rate", "rank", "alpha", "batch_size", "resolution", "resize_mode", "seed",
  "control_after_generate", "feature_layer", "t_prime", "t_prime_min", "t_prime_max", "distance",
  "normalize_features", "mse_weight", "gradient_checkpointing", "training_dtype", "lora_name", "overwrite",
  "save_every", "preview_every", "resume_from", "batched_frozen", "dataset_path", "tap_depth", "optimizer",
  "lr_schedule", "warmup_steps", "gradient_accumulation", "ema_decay", "save_weights", "algorithm", "lora_dtype",
  "save_format", "init_lora", "sample_prompts", "sample_every", "validation_split", "validation_every", "guidance",
  "perceptual_weight", "mse_space",
];
// Where each moved setting lives now, and its default there.
const MOVED = {
  "Self-Perceptual Objective": {
    feature_layer: "mid_block", tap_depth: 0.5, t_prime: "uniform", t_prime_min: 0.0, t_prime_max: 1.0,
    distance: "mse", normalize_features: false, perceptual_weight: 1.0, mse_weight: 0.0, mse_space: "native",
    guidance: 0.0,
  },
  "Self-Perceptual Training Options": {
    optimizer: "adamw", lr_schedule: "constant", warmup_steps: 0, gradient_accumulation: 1, ema_decay: 0.0,
    gradient_checkpointing: true, training_dtype: "auto", batched_frozen: false, resize_mode: "center_crop",
    dataset_path: "",
  },
  "Self-Perceptual LoRA Options": {
    algorithm: "LoRA", alpha: 8.0, lora_dtype: "fp32", init_lora: "[None]", save_format: "comfyui",
    save_weights: "raw", save_every: 0, resume_from: "[None]", overwrite: false,
  },
  "Self-Perceptual Monitoring": {
    preview_every: 0, sample_prompts: "", sample_every: 0, validation_split: 0.0, validation_every: 0,
  },
};

export function migrateOldValues(node, saved) {
  if (!Array.isArray(saved) || !node.widgets || saved.length <= node.widgets.length) return null;
  for (const w of node.widgets) {
    const i = OLD_LAYOUT.indexOf(w.name);
    if (i >= 0 && i < saved.length) w.value = saved[i];
  }
  const changed = [];
  for (const [group, defaults] of Object.entries(MOVED)) {
    for (const [name, fallback] of Object.entries(defaults)) {
      const i = OLD_LAYOUT.indexOf(name);
      if (i >= 0 && i < saved.length && saved[i] !== fallback) changed.push(`${group}: ${name} = ${JSON.stringify(saved[i])}`);
    }
  }
  return { node: node.id, changed };
}

app.registerExtension({
  name: "selfperc.fineTune.oldWorkflows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SelfPerceptualFineTune") return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      const migration = migrateOldValues(this, info?.widgets_values);
      if (migration) {
        (window.selfpercMigrations ??= []).push(migration);
        const detail = migration.changed.length
          ? "Add these option nodes with these values: " + migration.changed.join("; ")
          : "Its other settings were at their defaults, as the option nodes are when not connected.";
        const summary = `Self-Perceptual Fine-Tune #${this.id}: saved by an earlier version; its settings were ` +
          "moved to option nodes";
        console.warn(`${summary}. ${detail}`);
        app.extensionManager?.toast?.add?.({ severity: "warn", summary, detail, life: 20000 });
      }
      return r;
    };
  },
});
