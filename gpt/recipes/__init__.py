"""Stage recipes: what each pipeline stage computes, as plain functions over files
(prepare/tokenize, pretrain, the spam classifier, instruction finetuning)."""
