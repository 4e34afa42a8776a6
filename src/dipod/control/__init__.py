"""Flow-matching policies for continuous control: FPO++ with DiPOD and self-distillation."""
