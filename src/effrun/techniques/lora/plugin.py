from effrun.technique import Technique
from effrun.techniques.common import as_list, find_linears


class Lora(Technique):
    use_dora = False

    def transform_model(self, model):
        from peft import LoraConfig, get_peft_model

        targets = as_list(self.cfg.target_modules)
        find_linears(model, targets)  # clear error for a missing or non-linear target
        pc = LoraConfig(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                        target_modules=targets, use_dora=self.use_dora, bias="none")
        return get_peft_model(model, pc)

    def export(self, model, path):
        merged = model.merge_and_unload()
        merged.save_pretrained(path)
        return str(path)
