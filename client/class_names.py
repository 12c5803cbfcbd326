"""Full names of the classes, for people: the schema holds class codes only (TCGA study abbreviations).

The names are the TCGA study names (NCI Genomic Data Commons); a class outside the table is shown as
its code. PAM50 subtypes are named as in Parker et al. 2009.
"""

from __future__ import annotations

TCGA = {
    "ACC": "Adrenocortical carcinoma", "BLCA": "Bladder urothelial carcinoma", "BRCA": "Breast invasive carcinoma",
    "CESC": "Cervical squamous cell carcinoma and endocervical adenocarcinoma", "CHOL": "Cholangiocarcinoma",
    "COAD": "Colon adenocarcinoma", "DLBC": "Lymphoid neoplasm diffuse large B-cell lymphoma",
    "ESCA": "Esophageal carcinoma", "GBM": "Glioblastoma multiforme", "HNSC": "Head and neck squamous cell carcinoma",
    "KICH": "Kidney chromophobe", "KIRC": "Kidney renal clear cell carcinoma",
    "KIRP": "Kidney renal papillary cell carcinoma", "LAML": "Acute myeloid leukemia",
    "LGG": "Brain lower grade glioma", "LIHC": "Liver hepatocellular carcinoma", "LUAD": "Lung adenocarcinoma",
    "LUSC": "Lung squamous cell carcinoma", "MESO": "Mesothelioma", "OV": "Ovarian serous cystadenocarcinoma",
    "PAAD": "Pancreatic adenocarcinoma", "PCPG": "Pheochromocytoma and paraganglioma",
    "PRAD": "Prostate adenocarcinoma", "READ": "Rectum adenocarcinoma", "SARC": "Sarcoma",
    "SKCM": "Skin cutaneous melanoma", "STAD": "Stomach adenocarcinoma", "TGCT": "Testicular germ cell tumors",
    "THCA": "Thyroid carcinoma", "THYM": "Thymoma", "UCEC": "Uterine corpus endometrial carcinoma",
    "UCS": "Uterine carcinosarcoma", "UVM": "Uveal melanoma",
    "LumA": "Luminal A (PAM50)", "LumB": "Luminal B (PAM50)", "Her2": "HER2-enriched (PAM50)",
    "Basal": "Basal-like (PAM50)", "Normal": "Normal-like (PAM50)",
}


def names_for(schema) -> dict[str, str]:
    return {c: TCGA.get(c, c) for c in schema.classes}
