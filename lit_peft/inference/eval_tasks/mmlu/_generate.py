"""Write one lm-eval task file per MMLU subject (python eval/tasks/mmlu/_generate.py); the list is MMLU's 57."""

from pathlib import Path

SUBJECTS = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
]


def main() -> None:
    here = Path(__file__).parent
    for subject in SUBJECTS:
        words = subject.replace("_", " ")
        (here / f"local_mmlu_{subject}.yaml").write_text(
            f"include: _template_yaml\n"
            f"tag: local_mmlu_tasks\n"
            f"task: local_mmlu_{subject}\n"
            f"task_alias: {subject}\n"
            f"dataset_kwargs:\n  subject: {subject}\n"
            f'description: "The following are multiple choice questions (with answers) about {words}.\\n\\n"\n'
        )


if __name__ == "__main__":
    main()
