import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.speedups.gap_sampled_dropout import GAP_SAMPLED_SDPA
from modeling_mmretrieval.towers import get_minilm_path
from tiny_towers import tiny_dinov2
from transformers import Dinov2Model, PreTrainedConfig, VisionTextDualEncoderModel

QUERIES = ["red running shoes for men", "women's blue denim jeans", "leather wallet"]


@pytest.fixture(scope="module")
def minilm_path():
    return get_minilm_path()


def reference_minilm_embeddings(path, texts):
    """all-MiniLM-L6-v2 as sentence-transformers defines it: masked mean of the last hidden states."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_text_only_from_minilm_equals_mean_pooled_minilm(minilm_path):
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, pooling="mean", projection_dim=None).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm_path, config=model.config)
    assert model.config.architecture == "text_only"
    with torch.no_grad():
        ours = model.get_query_embeddings(**processor.encode_queries(QUERIES))
    reference = reference_minilm_embeddings(minilm_path, QUERIES)
    assert ours.shape == (3, 384)
    assert torch.allclose(ours, reference, atol=1e-5)
    # The pretrained tower is semantically meaningful: the shoe query is closest to a shoe product.
    with torch.no_grad():
        products = model.get_product_embeddings(**processor.encode_products(
            [{"title": "Nike Men Red Running Shoes"}, {"title": "Levis Women Blue Jeans"}, {"title": "Brown Leather Wallet"}]
        ))
    assert torch.equal((ours @ products.t()).argmax(dim=1), torch.arange(3))


def test_from_towers_keeps_pretrained_weights_and_infers_3tower(minilm_path, tmp_path):
    vision = Dinov2Model(tiny_dinov2()).eval()
    vision.save_pretrained(tmp_path / "vision")
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, tmp_path / "vision")
    assert model.config.architecture == "3tower" and model.config.fusion == "mlp"
    reference = AutoModel.from_pretrained(minilm_path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], tensor), name
    for name, tensor in vision.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def test_separate_towers_start_from_the_same_weights(minilm_path):
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, share_text_towers=False)
    query_tower, product_tower = model.text_model.state_dict(), model.product_text_model.state_dict()
    assert all(torch.equal(query_tower[name], product_tower[name]) for name in query_tower)
    assert model.text_model.embeddings.word_embeddings.weight.data_ptr() != (
        model.product_text_model.embeddings.word_embeddings.weight.data_ptr()
    )


def test_switching_attention_reaches_every_layer_of_adopted_towers(minilm_path):
    # A 4tMM built from pretrained towers: MiniLM for text, and a dual encoder (tiny DINOv2 + MiniLM) whose
    # own constructor had already swapped its towers' configs once.
    dual = VisionTextDualEncoderModel(vision_model=Dinov2Model(tiny_dinov2()), text_model=AutoModel.from_pretrained(minilm_path))
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, dual, architecture="4tower").eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm_path, config=model.config)

    def attention_in_layers():
        return {module.config._attn_implementation for module in model.modules()
                if isinstance(getattr(module, "config", None), PreTrainedConfig) and module is not model}

    def query_embeddings():
        inputs = processor.encode_queries(QUERIES)
        inputs["dual_input_ids"], inputs["dual_attention_mask"] = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            return model.get_query_embeddings(**inputs)

    assert attention_in_layers() == {"sdpa"}
    sdpa = query_embeddings()
    # The speedups reach every layer too: sdpa with dropout masks drawn by gap sampling in CPU training
    # (eval-mode results are sdpa's).
    speedups.apply(model)
    assert attention_in_layers() == {GAP_SAMPLED_SDPA}
    torch.testing.assert_close(query_embeddings(), sdpa, atol=0, rtol=0)
    model.set_attn_implementation("eager")
    assert attention_in_layers() == {"eager"}
    # Every layer now reads the model's own config, so later edits of model.config reach the weights' users.
    assert model.text_model.encoder.layer[0].attention.self.config is model.config.text_config
    assert model.dual_encoder.text_model.encoder.layer[0].attention.self.config is model.config.dual_encoder_config.text_config
    torch.testing.assert_close(query_embeddings(), sdpa, atol=1e-5, rtol=0)
