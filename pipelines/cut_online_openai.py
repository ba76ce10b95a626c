"""Online CUT with an OpenAI-compatible judge (OpenAI, vLLM, Ollama, TGI), as in the paper.

Each iteration the current model answers 1000 new Alpaca instructions, the judge writes a
judgment ("Perfect" means positive), CUT trains on the triplets and the merged model carries on.
Set OPENAI_API_KEY (or name a Prefect Secret in api_key_secret) and CUT_ALIGN_MODEL. OPENAI_API_KEY
goes to https://api.openai.com only: for another endpoint (CUT_ALIGN_JUDGE_URL), name the variable
holding its key in api_key_env.
"""

import os

from cut_core.dsl import CUT, Evaluation, Model, Online, OpenAIJudge, Pipeline

pipeline = Pipeline(
    name="cut-online",
    workdir="../work/cut-online",
    model=Model(path=os.environ.get("CUT_ALIGN_MODEL", "models/llama-2-13b-chat")),
    judge=OpenAIJudge(base_url=os.environ.get("CUT_ALIGN_JUDGE_URL", "https://api.openai.com/v1"),
                      model="gpt-4", concurrency=8),
    objective=CUT(threshold=1.1, alpha=1.0),   # the paper's online settings
    online=Online(iterations=4, prompts="../work/prompts/alpaca_instructions.jsonl",
                  prompts_per_iteration=1000, max_new_tokens=512),
    evaluation=Evaluation(heldout="../work/prompts/heldout.jsonl", max_prompts=200),
)
