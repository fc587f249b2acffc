from effrun.techniques.lora.plugin import Lora


class Dora(Lora):
    use_dora = True
